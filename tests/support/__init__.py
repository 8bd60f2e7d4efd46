"""Test fixtures shared by every tier: certificates, DNSSEC test bed, SMTP peers."""
