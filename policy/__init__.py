"""Spend policy language: parse, check and evaluate .spend rate tables and org policies."""
