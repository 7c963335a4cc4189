"""The serving layer between HTTP and the engine: the adapter service (every adapter verb: the
only caller of the registry and of the engine's administration for adapters), merged adapters
and per-adapter chat templates. No HTTP here: errors are the engine's and the store's domain
errors, which server/api translates."""
