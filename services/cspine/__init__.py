"""cspine: few-shot, multi-modal cervical spine tumor assistant (CT, MR, lateral X-ray)."""

__version__ = "0.1.0"
