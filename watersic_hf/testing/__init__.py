"""Test helpers shipped with watersic_hf (no network): a loopback fake of the Hugging Face Hub."""

from .hub_server import FakeHubServer, hub_env

__all__ = ["FakeHubServer", "hub_env"]
