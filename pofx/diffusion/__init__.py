"""Diffusion preference optimization: denoisers, noise schedules, samplers and their pair errors.

Import the submodules: `from pofx.diffusion import unet, schedules, samplers, pairs`. A diffusion
policy reaches the train step as every policy does, through `logps_fn(params, batch) -> PairLogps`
(here: minus half the per-image denoising errors of the chosen and rejected images, with a shared
timestep and noise per pair), so the loss registry, the reference strategies and the
perturbations apply unchanged.
"""
