"""Live speculative-decoding telemetry inside serving engines: windowed counts and drift alarms."""
