"""One init per method of the core, each registered in :data:`shared.methods.METHODS` with its traits."""
