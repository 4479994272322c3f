"""The engine: how kappa runs on Faust. Every private member of faust-streaming, aiokafka and
mode-streaming that kappa relies on is reached through `kappa.engine.faust_internals` only."""
