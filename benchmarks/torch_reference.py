"""What users would pick instead: the CIFAR VGG-16 / ResNet-56 training step with the receding penalty in
PyTorch, written as the paper's reference implementation does (sigmoid-scaled BatchNorm without affine
parameters, penalty added to the loss, SGD Nesterov with coupled weight decay). Used by `run.py` only
when torch is installed; nothing in the package imports it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class SigmoidBN(nn.BatchNorm2d):
  """BatchNorm without gamma/beta, scaled by sigmoid(logit) per channel."""

  def __init__(self, channels: int):
    super().__init__(channels, affine=False)
    self.logit = nn.Parameter(torch.randn(channels))

  def forward(self, x):
    return super().forward(x) * torch.sigmoid(self.logit)[None, :, None, None]


def _conv(cin, cout, stride=1, bias=False):
  return nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)


class VGG(nn.Module):
  def __init__(self, num_classes=10):
    super().__init__()
    layers, cin = [], 3
    for v in VGG16:
      if v == "M":
        layers.append(nn.MaxPool2d(2))
      else:
        layers += [_conv(cin, v, bias=True), SigmoidBN(v), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    return self.classifier(torch.flatten(F.avg_pool2d(self.features(x), 2), 1))


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, cout, stride), SigmoidBN(cout)
    self.conv2, self.bn2 = _conv(cout, cout), SigmoidBN(cout)
    self.stride, self.pad = stride, cout - cin

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    s = x[:, :, :: self.stride, :: self.stride]
    if self.pad:
      s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
    return F.relu(y + s)


class ResNet56(nn.Module):
  def __init__(self, num_classes=10):
    super().__init__()
    self.conv, self.bn = _conv(3, 16), SigmoidBN(16)
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
      for b in range(9):
        blocks.append(Block(cin, width, 2 if stage and not b else 1))
        cin = width
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.blocks(self.bn(self.conv(x)))
    return self.fc(x.mean((2, 3)))


def receding_penalty(model: nn.Module, shift: float) -> torch.Tensor:
  total = 0.0
  for m in model.modules():
    if isinstance(m, SigmoidBN):
      log_s = F.logsigmoid(m.logit + shift)
      total = total + (log_s.exp() * (1 - log_s)).sum()
  return total


def make_train_step(name: str, batch_size: int, strength: float = 1e-3, shift: float = 3.0):
  """A closure running one training step on a fixed random batch, and the model."""
  model = {"cifar_vgg16": VGG, "cifar_resnet56": ResNet56}[name]()
  norm = [p for n, p in model.named_parameters() if n.endswith("logit")]
  rest = [p for n, p in model.named_parameters() if not n.endswith("logit")]
  opt = torch.optim.SGD([{"params": rest, "weight_decay": 1e-4}, {"params": norm, "lr": 1.0, "weight_decay": 0}],
                        lr=0.1, momentum=0.9, nesterov=True)
  x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
  model.train()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y) + strength * receding_penalty(model, shift)
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step
