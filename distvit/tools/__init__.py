"""Commands beside training: dataset preparation, the preflight checks, evaluate, predict, doctor, and the
benchmarks against the lesson."""
