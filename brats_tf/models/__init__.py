"""Keras 3 functional models, one module per family, each with an explicit table of its kinds
(`KINDS`): unet2d (2D model 1, 2D model 2, U-Net axial), unet3d (standard 3D, 2D-3D A, B,
C), baselines ([S] BCN, patch FCN, FIFCN), and the shared blocks. Import the family module,
e.g. `from brats_tf.models import unet2d`."""
