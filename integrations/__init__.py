"""Thin adapters between lora_monitor and trainers/trackers (imported as lora_monitor.integrations)."""
