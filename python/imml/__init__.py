"""imml: Python bindings of libimml, ctypes over libimml.so.1.

libimml implements IMML (Li et al., arXiv:2406.11490): a modality
discriminative knowledge exploration network and a beta-generalization
front-door adjustment in front of the fusion and target head, for
multi-modal models whose modalities learn unevenly.

- ``imml.Model``: the numpy layer (forward, backward, commit, step,
  train_step, predict, save, load; parameters and gradients as numpy views
  over the library's memory, by name).
- ``imml.torch``: ``imml.torch.IMML``, an ``nn.Module`` whose forward is a
  ``torch.autograd.Function`` over libimml, so that PyTorch encoders train
  through it (imported on demand: ``import imml.torch``).

Errors of the library raise ``imml.ImmlError`` with libimml's message;
wrong arguments raise TypeError or ValueError before any C call.
"""

from ._model import (CONFIG_KEYS, ImmlError, Losses, Model, Param,
                     Prediction, library_path, set_threads, version)

__version__ = version()

__all__ = ["CONFIG_KEYS", "ImmlError", "Losses", "Model", "Param",
           "Prediction", "library_path", "set_threads", "version",
           "__version__"]
