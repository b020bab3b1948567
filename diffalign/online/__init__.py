"""On-line alignment: sample on-policy images -> score -> build pairs or positive/negative sets -> train -> repeat.

The pieces the on-policy loop (pipelines/online.py) composes, each a function of tensors:
- `pairs.py`: who wins. Pair builders for D3PO (`all_pairs`) and DRAGON (`best_worst` paired, `top_bottom`
  unpaired), and human-label files (ties skipped).
- `experts.py`: reference sets. Toy exemplars of a chosen property + a toy colour-statistics encoder (DRAGON with
  an exemplar-set reward), and preference-set winners as Diffusion-DRO experts.
- `steps.py`: the per-method training losses on a round's samples: D3PO on stored trajectory steps, DRAGON through
  the shared estimator (Diffusion-DPO / Diffusion-KTO at forward-noised generated x0), Diffusion-DRO with expert
  and snapshot-policy halves.
The sampler with trajectories and per-step log-probs is diffalign.sampling.
"""
