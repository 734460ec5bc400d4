r"""Generates `smollm2_prompts.jsonl`, the prompts of the SmolLM2 example study (deterministic).

    python experiments/data/make_smollm2_prompts.py     # rewrites the file next to this script

Each record: {"id", "term", "key", "prompt", "split"}. The terms below were written for the study
(science, technology, medicine, economics, history, arts, everyday life); each is asked about in
one of four phrasings that ask for a short answer, in turn. `key` is the term in lower case, the
word(s) the gold reward of `experiments/smollm2_study.py` wants in the answer. A quarter of the
terms (a fixed permutation, seed 0) are held out ("heldout"), the rest are "train".
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "smollm2_prompts.jsonl")

TEMPLATES = (
  "Explain {term} in a few words.",
  "What is {term}? Answer briefly.",
  "Describe {term} in one short sentence.",
  "In a few words, what is {term}?",
)

TERMS = """
photosynthesis gravity entropy recursion inflation volcano DNA evolution electricity magnetism
friction momentum osmosis mitosis meiosis enzyme protein vaccine antibiotic virus bacteria
climate erosion earthquake tsunami glacier hurricane tornado rainbow eclipse comet asteroid
galaxy nebula supernova quasar telescope microscope atom molecule electron proton neutron isotope
radioactivity fusion fission catalyst oxidation combustion acid salt crystal polymer plastic
algorithm compiler database encryption firewall router bandwidth latency cache kernel
blockchain cryptocurrency spreadsheet browser website email password malware bitcoin robot
democracy monarchy republic constitution parliament election taxation tariff recession unemployment
mortgage dividend stock bond budget bankruptcy monopoly supply demand capitalism socialism
metaphor simile haiku sonnet novel poetry grammar syntax vocabulary dialect alphabet
symphony opera jazz rhythm melody harmony orchestra violin piano guitar ballet
painting sculpture architecture photography cinema theatre comedy tragedy mythology folklore
philosophy ethics logic democracy psychology sociology anthropology archaeology linguistics geography
renaissance feudalism colonialism industrialization globalization urbanization migration diplomacy treaty empire
vitamin calorie metabolism digestion circulation respiration immunity allergy insulin diabetes
hormone neuron synapse memory sleep dream anxiety empathy motivation habit
nutrition exercise meditation yoga hygiene fever headache cholesterol caffeine hydration
oxygen hydrogen carbon nitrogen helium iron copper gold silver aluminum
photon wavelength frequency resonance radiation refraction reflection lens prism laser
thermometer barometer compass magnet battery transistor semiconductor capacitor resistor circuit
satellite rocket orbit spacecraft astronaut moon planet star sun meteor
ocean river desert forest savanna tundra wetland coral reef island peninsula
photosynthesis pollination germination fertilizer irrigation harvest compost soil seed fungus
ecosystem biodiversity extinction habitat predator camouflage migration hibernation symbiosis food chain
recycling pollution deforestation drought flood wildfire greenhouse gas carbon footprint solar power wind turbine
geometry algebra calculus statistics probability fraction equation integer prime number triangle
derivative integral matrix vector logarithm exponent percentage median average infinity
internet smartphone software hardware operating system artificial intelligence machine learning neural network cloud computing search engine
library museum university hospital airport bakery pharmacy supermarket restaurant factory
bicycle airplane submarine train elevator bridge tunnel skyscraper lighthouse windmill
chess football basketball tennis marathon olympics referee tournament trophy stadium
coffee tea bread cheese chocolate honey yogurt vinegar sugar spice
passport visa currency tourism souvenir luggage hotel itinerary ferry customs
friendship kindness honesty patience courage gratitude curiosity humility loyalty forgiveness
insurance loan interest rate credit card savings account pension invoice receipt salary
thunderstorm humidity fog snowflake avalanche monsoon drizzle frost breeze sunset
gene chromosome cell nucleus membrane mitochondria ribosome tissue organ skeleton
heart lung kidney liver brain muscle bone blood skin stomach
""".split("\n")


def terms():
  """The distinct terms in order of first appearance (multi-word terms kept whole)."""
  multi = {
    "food chain",
    "greenhouse gas",
    "carbon footprint",
    "solar power",
    "wind turbine",
    "prime number",
    "operating system",
    "artificial intelligence",
    "machine learning",
    "neural network",
    "cloud computing",
    "search engine",
    "interest rate",
    "credit card",
    "savings account",
    "coral reef",
  }
  out, seen = [], set()
  for line in TERMS:
    words = line.split()
    i = 0
    while i < len(words):
      two = " ".join(words[i : i + 2])
      term = two if two in multi else words[i]
      i += 2 if two in multi else 1
      if term not in seen:
        seen.add(term)
        out.append(term)
  return out


def records():
  ts = terms()
  order = list(range(len(ts)))
  random.Random(0).shuffle(order)
  heldout = set(order[: len(ts) // 4])
  recs = []
  for i, term in enumerate(ts):
    recs.append(
      {
        "id": i,
        "term": term,
        "key": term.lower(),
        "prompt": TEMPLATES[i % len(TEMPLATES)].format(term=term),
        "split": "heldout" if i in heldout else "train",
      }
    )
  return recs


def main():
  recs = records()
  with open(OUT, "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  n_held = sum(r["split"] == "heldout" for r in recs)
  print(f"{OUT}: {len(recs)} prompts, {len(recs) - n_held} train, {n_held} held out")


if __name__ == "__main__":
  main()
