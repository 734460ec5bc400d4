"""The new methods, each trained on the controlled world after one shared SFT stage and dataset.

    python -m experiments.main --config=configs/new_methods.py --workdir=/tmp/pofx_new

One sweep member per method, in <workdir>/sweep/<label>; `<workdir>/reward_vs_kl.png` places them
on one gold-reward-versus-KL chart. These members read inputs beyond the pair's log-probs, which
the program builds per batch: KTO's mismatched pairs (its reference point z0), BMC's masks of the
tokens where chosen and rejected differ, Sem-DPO's prompt and completion embeddings and 2D-DPO's
segment x aspect scores (both from the world). All use a frozen reference: BMC and 2D-DPO read
per-token reference log-probs and KTO scores its mismatched pairs with the reference, which a
cache cannot do. `:tiny` runs every member for a few steps.
"""

from configs import _shrink, common

# label -> (train.loss, train.loss_hyper)
MEMBERS = {
  "kto": ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
  "bmc": ("bmc", {"beta": 0.1, "delta": 2.0}),
  "sem_dpo": ("sem_dpo", {"beta": 0.1, "alpha": 1.0}),
  "two_d_dpo": ("two_d_dpo", {"beta": 0.1}),
}


def get_config(arg=None):
  c = common.base_config()
  c.train.loss = "dpo"
  c.train.reference.kind = "frozen"
  # One batch shape: a world pair (prompt <= 8 tokens with BOS and SEP, completions <= 12) fills at
  # most one 32-token prompt-shared row, so each member compiles its step once.
  c.data.seq_bucket, c.data.completion_bucket = 32, 16
  _shrink.apply(c, arg)
  c.sweep = tuple(
    {"label": label, "overrides": {"train.loss": loss, "train.loss_hyper": dict(hyper)}}
    for label, (loss, hyper) in MEMBERS.items()
  )
  c.lock()
  return c
