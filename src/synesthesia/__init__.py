"""synesthesia: Direct Latent Augmentation (DLA) and MESSy distillation.

Stage one turns RGB into undecoded latents of modalities a deployed model will
not have (depth, audio, LiDAR-like range scans) and writes them to webdataset
shards; stage two trains RGB-only students against them with HF accelerate.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake of the user's (bad config, missing file): reported as one line, exit code 2."""
