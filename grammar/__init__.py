"""The .spend grammar (spend.lark), shipped in the wheel as package ``spendkeeper_grammar``."""
