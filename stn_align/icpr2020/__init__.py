"""Reproduce the ICPR 2020 "where should a spatial transformer sit?" experiment.

Finnveden, Jansson & Lindeberg, "Understanding when spatial transformer networks do not
support invariance, and what to do about it", ICPR 2020 (arXiv:2004.11678); authors' code:
github.com/luuf/stn-placement. The package holds it in five parts: :mod:`.data`, :mod:`.networks`,
:mod:`.train`, :mod:`.figures` and :mod:`.report` (:func:`run_reproduce`, what ``stn-align reproduce`` runs).

Protocol (choices follow the paper's text and, where the text is silent, the authors' code;
every choice is also written into ``results.md`` / ``results.json``):

``mnist-rot``
    MNIST digits (28x28, values in [0, 1]) rotated about the centre by an angle drawn
    uniformly from [-90, 90] degrees (bilinear, black fill), a fresh angle every time an image
    is drawn for training; the test set is rotated once with a fixed generator (seed 12345) so
    every network is scored on the same images. Normalised with MNIST's (0.1307, 0.3081).
``mnist-trans``
    Each digit pasted into a black 60x60 canvas at a uniformly random integer offset of up to
    +-16 px from the centre, plus the authors' clutter: six random 6x6 crops of random MNIST
    training digits added at random places (clamped to 1). Normalised with (0.0363, 0.1870).
    As in the authors' code the transformers output a 30x30 image (``out_scale=0.5``); the
    plain CNN sees the full 60x60 canvas.
``svhn``
    The 32x32 cropped-digit SVHN files (``train_32x32.mat``/``test_32x32.mat``, user-supplied,
    read with scipy), per-channel scaled to [-1, 1]. The paper used a different SVHN set-up
    (multi-digit crops) and a deeper network, so its Table 2 is a reference, not a target.

Networks: the MNIST CNN is Jaderberg et al.'s conv9x9(64)-pool-ReLU-conv7x7(64)-pool-ReLU-FC10,
as in the authors' code; STN-C1 / STN-SL1 use depth 1 (after the first conv block). Every
localisation net is ``localisation_features`` (two 5x5 convs with 20 filters + FC20) followed
by the identity-initialised affine regression; sampler padding ``border`` for MNIST, ``zeros``
for SVHN (as in the authors' code). Training (:data:`PROTOCOLS`): ``paper`` = the authors' SGD
(momentum 0), lr 0.01, batch 256, 150 000 iterations, lr / 10 at 1/3 and 2/3; ``short`` = a CPU
budget (Adam, cosine-annealed, lr / batch per experiment in :data:`DEFAULT_OPTIMISER`);
``curriculum`` = 20 CPU epochs in which the transformers do learn to rotate (SGD momentum 0.9,
localisation lr x10, training rotations ramped from 0 to 90 deg over 3 epochs); every value can
be overridden. The localisation nets train at ``loc_lr_scale`` x lr. Checkpoints after every
epoch make runs resumable. Why the other budgets do not make the transformers rotate:
``docs/icpr2020/README.md``.
"""

from .data import (CANVAS, EXPERIMENTS, MAX_SHIFT, MNIST_NORM, ROT_MAX_DEG, Dataset, augment_batch, load_mnist, load_svhn,
                   prepare_mnist_root, rotate_images, translate_with_clutter)
from .figures import draw_figure2, draw_figure3, draw_training_curves
from .networks import (MNIST_BLOCKS, SVHN_BLOCKS, ConvBlockSpec, STNClassifier, build_cnn, build_network, build_stn_c0,
                       build_stn_cx, build_stn_slx, network_names)
from .report import run_reproduce
from .train import (PROTOCOLS, ReproduceConfig, RunResult, TrainingProtocol, lr_factor, predicted_rotation_angles,
                    rotation_r_per_class, rotation_slope, rotation_tracking_r, test_error_pct, train_network)

__all__ = ["CANVAS", "EXPERIMENTS", "MAX_SHIFT", "MNIST_BLOCKS", "MNIST_NORM", "PROTOCOLS", "ROT_MAX_DEG", "SVHN_BLOCKS",
           "ConvBlockSpec", "Dataset", "ReproduceConfig", "RunResult", "STNClassifier", "TrainingProtocol", "augment_batch",
           "build_cnn", "build_network", "build_stn_c0", "build_stn_cx", "build_stn_slx", "draw_figure2", "draw_figure3",
           "draw_training_curves", "load_mnist", "load_svhn", "lr_factor", "network_names", "predicted_rotation_angles",
           "prepare_mnist_root", "rotate_images", "rotation_r_per_class", "rotation_slope", "rotation_tracking_r",
           "run_reproduce", "test_error_pct", "train_network", "translate_with_clutter"]
