"""pofx's Diffusion-DPO loss and DDIM sampler against diffusers on the `bench` U-Net (same weights).

    python benchmarks/diffusion_parity.py [--pairs 16] [--steps 10] [--json PATH]

Both sides get the same parameters: pofx's `unet.init` for the policy and (another key) the
reference, written as diffusers folders by `pofx.diffusion.diffusers_io.save` and loaded with
`diffusers.UNet2DModel.from_pretrained`. Then:

- the loss: one `pofx.train.make_train_step(logps_fn, ..., loss="dpo", loss_hyper={"beta": 5000})`
  with a frozen reference (`pofx.diffusion.pairs.make_logps_fn`) on random pairs, against the
  formula of diffusers' research example (`DDPMScheduler.add_noise`, per-image mean squared error
  against the noise, `-logsigmoid(-beta/2 ((e_w - e_l) - (r_w - r_l)))`) in PyTorch on the same
  images, timesteps and noise (`pairs.timesteps_and_noise`);
- sampling: `pofx.diffusion.samplers.sample` (DDIM, eta = 1) against `DDIMScheduler.step` driving
  the diffusers model from the same x_T with the same per-step noises (`variance_noise`), and the
  per-step log-probs against scipy's normal density around diffusers' step mean.

It prints the largest differences as JSON. Speed is not measured here (benchmarks/diffusion_step.py).
"""

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from scipy.stats import norm

import pofx
from pofx.diffusion import diffusers_io, pairs, samplers, schedules, unet


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--pairs", type=int, default=16)
  ap.add_argument("--steps", type=int, default=10, help="DDIM steps of the sampling check")
  ap.add_argument("--beta", type=float, default=5000.0)
  ap.add_argument("--json", default=None)
  a = ap.parse_args()

  cfg = unet.preset("bench")
  model = unet.make(cfg)
  policy, ref = model.init(jax.random.key(0)), model.init(jax.random.key(1))
  folder = tempfile.mkdtemp()
  diffusers_io.save(folder + "/policy", cfg, policy)
  diffusers_io.save(folder + "/ref", cfg, ref)
  torch_policy = UNet2DModel.from_pretrained(folder + "/policy").eval()
  torch_ref = UNet2DModel.from_pretrained(folder + "/ref").eval()

  B, S, C = a.pairs, cfg.sample_size, cfg.in_channels
  rng = np.random.default_rng(0)
  batch = pairs.ImagePairs(
    chosen=jnp.asarray(rng.uniform(-1, 1, (B, S, S, C)), jnp.float32),
    rejected=jnp.asarray(rng.uniform(-1, 1, (B, S, S, C)), jnp.float32),
    class_labels=jnp.asarray(rng.integers(0, cfg.num_class_embeds, B), jnp.int32),
    noise_keys=jax.random.key_data(jax.random.split(jax.random.key(5), B)),
    pair_mask=jnp.ones(B, jnp.float32),
  )
  s = schedules.linear()
  logps_fn = pairs.make_logps_fn(model.denoise, s)
  reference = pairs.check_reference(pofx.references.frozen(ref, logps_fn))
  opt = optax.adamw(1e-5)
  step = pofx.train.make_train_step(logps_fn, opt, loss="dpo", loss_hyper={"beta": a.beta}, reference=reference)
  state = pofx.train.init_state(policy, opt, reference, pofx.perturbations.none(), loss="dpo")
  _, metrics = step(state, {"pairs": batch}, jax.random.key(0))
  e_w, e_l = jax.jit(lambda p: pairs.pair_errors(model.denoise, p, s, batch))(policy)

  t, eps = pairs.timesteps_and_noise(batch.noise_keys, (S, S, C), s)
  sched = DDPMScheduler(num_train_timesteps=1000)
  x0 = torch.cat([_nchw(batch.chosen), _nchw(batch.rejected)])
  noise = _nchw(eps).repeat(2, 1, 1, 1)
  tt = torch.from_numpy(np.asarray(t, np.int64)).repeat(2)
  cls = torch.from_numpy(np.asarray(batch.class_labels, np.int64)).repeat(2)
  with torch.no_grad():
    xt = sched.add_noise(x0, noise, tt)
    t_w, t_l = (torch_policy(xt, tt, class_labels=cls).sample - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    r_w, r_l = (torch_ref(xt, tt, class_labels=cls).sample - noise).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    loss = -torch.nn.functional.logsigmoid(-0.5 * a.beta * ((t_w - t_l) - (r_w - r_l))).mean()
  rel = lambda x, y: float(np.max(np.abs(np.asarray(x) - y.numpy()) / np.abs(y.numpy())))

  n = 4
  labels = np.arange(n, dtype=np.int32) % cfg.num_class_embeds
  key = jax.random.key(3)
  traj = samplers.sample(model.denoise, policy, s, key, labels, shape=(n, S, S, C), num_steps=a.steps, eta=1.0)
  k_init, k_steps = jax.random.split(key)  # the draws of `sample`, in its order
  x = _nchw(jax.random.normal(k_init, (n, S, S, C)))
  noises = [_nchw(jax.random.normal(k, (n, S, S, C))) for k in jax.random.split(k_steps, a.steps)]
  ddim = DDIMScheduler(clip_sample=False)
  ddim.set_timesteps(a.steps)
  latent_diff, logp_diff = 0.0, 0.0
  with torch.no_grad():
    for i, ti in enumerate(ddim.timesteps):
      pred = torch_policy(x, ti.repeat(n), class_labels=torch.from_numpy(labels.astype(np.int64))).sample
      mean = ddim.step(pred, ti, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
      x = ddim.step(pred, ti, x, eta=1.0, variance_noise=noises[i]).prev_sample
      ours = np.asarray(traj.latents[i + 1]).transpose(0, 3, 1, 2)
      latent_diff = max(latent_diff, float(np.abs(ours - x.numpy()).max()))
      sigma = float(((x - mean) / noises[i]).mean())
      if sigma > 0:
        want = norm.logpdf(x.numpy().astype(np.float64), mean.numpy(), sigma).sum(axis=(1, 2, 3))
        logp_diff = max(logp_diff, float(np.max(np.abs(np.asarray(traj.log_probs[i]) - want) / np.abs(want))))

  res = {
    "unet": "bench",
    "pairs": B,
    "beta": a.beta,
    "errors_max_rel_diff": max(rel(e_w, t_w), rel(e_l, t_l)),
    "loss_pofx": float(metrics["loss"]),
    "loss_diffusers": float(loss),
    "loss_abs_diff": abs(float(metrics["loss"]) - float(loss)),
    "ddim_steps": a.steps,
    "ddim_latents_max_abs_diff": latent_diff,
    "ddim_log_probs_max_rel_diff": logp_diff,
  }
  print(json.dumps(res, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
