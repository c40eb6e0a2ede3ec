"""The test suite, one package per code package: core (shared), common (tsd_common), diffusion, text, benchmarks,
apps."""
