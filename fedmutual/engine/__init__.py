"""The training kernel: client cohorts trained by the plain loop or as stacked models, and shared evaluation.

It knows nothing of algorithms, parties or runtimes: a cohort is a list of jobs (members, data, loss weights).
"""
