"""Image-generation metrics as pure tensor code: FID from feature statistics, the FID
Inception-v3 network, PGGAN's MS-SSIM, reconstruction RMSE/PSNR, sharpness (variance of the
Laplacian, share of high-frequency power).

Imports torch and numpy only (no DeepSpeed, WebDataset or YAML), so each metric is tested
on tensors alone; :mod:`introvae_dist.evaluation` feeds them images over all ranks.
"""
