"""Who may send what: the keys file, the per-key rules, the counters behind them (stores), hot reload."""
