"""The method core: configuration, the registries (methods, rankings, sparse backends, drift
signals), scoring, budgets, drift monitors, model adapters, the patched FFN, the controller (its
schedule, selection and accounting) and `attach`. Imports only `dart_ext`, torch and
`dart.results`; never runtimes, evaluation, Lightning, the CLI or plotting."""
