"""Synthetic defects with exact masks, validation categories in the MVTec AD layout, the demo's photographs."""
