"""open_clip_sigrel: the relative-bias sigmoid loss as a plugin for open_clip."""
__version__ = "0.1.0"

from open_clip_sigrel.loss import SigRelLoss, multimodal_sigrel_loss, sigrel_loss  # noqa: E402

__all__ = ["SigRelLoss", "multimodal_sigrel_loss", "sigrel_loss", "__version__"]
