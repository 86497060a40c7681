"""The one sampling loop of Stage C and Stage B (:func:`~stable_cascade.sampling.loop.run_stage`): a UNet
and its conditioning, guided, stepped by a sampler of :mod:`stable_cascade.diffusion` through a schedule,
with NaN/Inf guards. The pipelines call it; it knows nothing of pipelines."""
