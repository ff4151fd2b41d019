"""The harness above the library: benchmarks, the peer comparison, the demo, tiny test models, the shapes
data, training, evaluation, generation and the command line. It imports the core; the core never imports it."""
