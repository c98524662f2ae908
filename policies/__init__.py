"""The ways of choosing which residual blocks run: one module per method.

:mod:`policies.method` defines what a method provides and :mod:`policies.registry`
finds and names them; :mod:`policies.rewards` holds the paper's equations and
:mod:`policies.source` the policy-source interface that evaluation runs.
"""
