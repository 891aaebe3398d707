"""Governance: what the policy allows, who owns it, and what the audit trail says happened.

Offline analysis over configs and audit trails (`sidekey access`, `explain`, `posture`,
`inventory --audit`, `audit verify`), and the `policy` snapshot the runtime writes into the
trail at every start and reload so the trail alone answers "what was allowed when".
Nothing here does network IO; the live parts (deny-list watcher, reload) are the runtime's.
"""
