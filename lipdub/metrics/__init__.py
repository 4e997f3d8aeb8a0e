"""Evaluation metrics: lip-sync (LSE-D / LSE-C via SyncNet v2) and image quality (PSNR / SSIM)."""
from .lse import compute_lse, mfcc_features, sync_distances
from .quality import psnr, ssim

__all__ = ["compute_lse", "mfcc_features", "sync_distances", "psnr", "ssim"]
