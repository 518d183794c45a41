"""Cross-backend conformance: the proof that every backend computes the same training run.

- :mod:`~specforge.conformance.masks`: dropout masks drawn by specforge, not a framework;
- :mod:`~specforge.conformance.compare`: differences, tolerances and the chaos floor;
- :mod:`~specforge.conformance.check`: one program through every backend and the numpy
  reference (:mod:`specforge.reference`): forward, gradients, N steps;
- :mod:`~specforge.conformance.report`: tables, report.json and losses.png;
- :mod:`~specforge.conformance.suite`: the shipped cases that together cover the spec
  language, with per-backend exclusions, for any backend (third-party ones too).
"""
