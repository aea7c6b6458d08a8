"""What was used: token usage read from client-bound bytes, the accounting addon, the usage ledger."""
