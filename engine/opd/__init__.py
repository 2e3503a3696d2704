"""On-policy distillation: fields, routing, query-state selection, losses."""
