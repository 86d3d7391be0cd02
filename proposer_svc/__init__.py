"""The proposer: drafts tokens for verifiers (draft model or n-gram prompt lookup)."""
