"""synesthesia: Direct Latent Augmentation (DLA) and MESSy distillation.

Stage one turns RGB into undecoded latents of modalities a deployed model will
not have (depth, audio, LiDAR-like range scans) and writes them to webdataset
shards; stage two trains RGB-only students against them with HF accelerate.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake of the user's (bad config, missing file): reported as one line, exit code 2."""


def __getattr__(name):
    """``synesthesia.load_student(path)``: an exported student, ready for inference (imported lazily)."""
    if name == "load_student":
        from synesthesia.train.export import load_student

        return load_student
    raise AttributeError(f"module 'synesthesia' has no attribute {name!r}")
