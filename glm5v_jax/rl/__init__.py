"""Multimodal RL (the report's section 2.4), layered above `generate/` and below `train/`.

  types.py       Task, Score, Component, RewardSpec, the verifier signature
  verifiers.py   rule verifiers (count, exact, choice, grounding, pointing, ANLS, relaxed numbers, format)
                 and their one registry VERIFIERS
  metrics.py     unbiased pass@k, per-data-source reward / pass@k / failure-rate statistics summed across
                 data-parallel shards
  tools.py       on-image tools (crop, draw_boxes, mark_points), the [0, 1000] coordinate convention and
                 the tool-call syntax; a malformed call is an observation, never an exception
  scenes.py      images drawn for the families: bar charts, tables, tool scenes
  tasks.py       verifiable task families (FAMILIES, each with its data_source tag and reward spec) and
                 their mixture by weight (TaskMix)
  gym.py         one environment protocol for single-step and multi-step (tool) tasks
  rollout.py     the rollout driver: environments against the generation engine, the engine's tokens kept
                 (loss mask 0 on observations)
  rewards.py     the reward system: (task, response) -> Score through the source's RewardSpec; aggregators
  rule_pool.py   rule verifiers in worker processes with wall-clock timeouts (a hung worker is replaced)
  judge.py       model-based judges over any OpenAI-compatible endpoint: concurrency limit, retries with
                 backoff, flagged fallback scores; rubrics
  judge_server.py  `python -m glm5v_jax.rl.judge_server --workdir=RUN`: a run served through the engine
                 with an OpenAI-compatible chat endpoint
  evaluate.py    `python -m glm5v_jax.rl.evaluate --workdir=RUN`: reward and pass@k per family
  http_json.py   the JSON HTTP handler of the judge server (and of the test and benchmark judges)
  advantages.py  GRPO / Dr.GRPO / RLOO advantages per group, DAPO overlong shaping
  controller.py  the rollout controller: rewards started on each episode's completion, over-sampling with
                 the equal-reward filter, early abort by count or time, aborted groups cached and resumed,
                 bounded staleness
  simulated.py   a simulated engine (lognormal answer lengths, virtual clock) for pipeline tests and benches
  reference.py   the reference policy resident in host memory: prefetched to the devices before its forward,
                 deleted right after
  objectives.py  policy losses (clipped surrogate with clip-higher and dual clip, GSPO, TIS, KL k1/k2/k3)
                 aggregated as global (sum, count) pairs; presets grpo, dr_grpo, dapo, gspo
"""
