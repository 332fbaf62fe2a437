"""Knowledge distillation: the frozen teacher (:mod:`.teacher`), the step loss through
``swkernels.fused_linear_distill`` (:mod:`.loss`), and the offline top-k teacher cache
(:mod:`.cache`, built by `swengine distill-cache`, :mod:`.cli`).

Imports nothing heavy here: :mod:`.cli` must stay importable without torch."""
