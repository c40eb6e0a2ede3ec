"""What the frontends (``tsd_diffusion``, ``tsd_text``) and the benchmarks share: the user cache and the fetched
offline assets, the launch checks and command-line error boundary, and training checkpoints. The adapter core
(``shared``) never imports it."""
