"""stn-align: align an input image to a reference with a siamese spatial transformer network.

Convention, used everywhere: a transform is a 3x3 matrix ``M`` mapping **input pixel
coordinates to reference pixel coordinates** (x right, y down, pixel centres at integers,
as in OpenCV), so ``cv2.warpPerspective(input, M, (ref_w, ref_h))`` reproduces the output.
"""

__version__ = "0.3.0"

__all__ = ["Aligner", "AlignResult", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch
    if name in ("Aligner", "AlignResult"):
        from . import align

        return getattr(align, name)
    raise AttributeError(name)
