"""The experiment: a teacher, then students and InherNet over seeds (`runs`), the
whole config checked before training (`validate`: the fields; `preflight`: every model, spec, dataset and the workdir built on shapes only), typed records (`records`), the
results tables (`report`) and plots (`figures`, `loss_axis`), and sentence-encoder
students (`sentence_distill`).

May import: every other subpackage (the top floor of the library).
"""
