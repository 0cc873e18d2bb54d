"""The quickstart, shrinking while it trains (docs/shrinking.md): from epoch 4 on, every 2 epochs, the channels
whose importance stayed at or below 0.05 for 2 checks in a row are removed, with their optimiser state, up to
30% of the prunable channels (the smallest ratio the prune phase asks for); then the same prune (counted on
the unshrunk network) and fine-tune as the quickstart. The quickstart's importances settle between 0.01 and
0.05 within its 345 steps, hence 0.05 rather than the default 0.01."""

import importlib.util
import pathlib


def get_config():
  path = pathlib.Path(__file__).with_name("quickstart.py")  # Config files load by path, not as a package.
  spec = importlib.util.spec_from_file_location("quickstart_config", path)
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  c = quickstart.get_config()
  c.shrink.enabled = True
  c.shrink.threshold = 0.05
  c.shrink.every_epochs = 2
  c.shrink.patience = 2
  c.shrink.start_epoch = 4
  c.shrink.max_ratio = 0.3
  return c
