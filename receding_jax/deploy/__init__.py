"""Deployment: norms folded into the layers before them, exported to StableHLO (`jax.export`) and LiteRT.

`export_model` writes a verified export folder from a Linen model and its variables (or an NNX model);
`find_folds`, `fold_variables` and `folded_function` are the folding on its own. StableHLO needs only jax;
the LiteRT format needs the ``[export]`` extra (TensorFlow, ai-edge-litert), imported only when a TFLite
file is made or run.
"""

from receding_jax.deploy.folding import Folding, find_folds, fold_variables, folded_function
from receding_jax.deploy.litert import MissingExportTools
from receding_jax.deploy.model_export import FORMATS, TOLERANCE, ExportVerificationError, export_model
from receding_jax.deploy.preprocessing import Normalisation

__all__ = [
    "FORMATS",
    "TOLERANCE",
    "ExportVerificationError",
    "Folding",
    "MissingExportTools",
    "Normalisation",
    "export_model",
    "find_folds",
    "fold_variables",
    "folded_function",
]
