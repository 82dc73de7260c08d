"""The method core: configuration, the method registry, scoring, budgets, drift monitors, model
adapters, the patched FFN, the controller and `attach`. Imports only `dart_ext`, torch and
`dart.results`; never runtimes, evaluation, Lightning, the CLI or plotting."""
