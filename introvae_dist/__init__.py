"""IntroVAE (Huang et al., NeurIPS 2018) trained with two DeepSpeed engines."""

__version__ = "0.1.0"
