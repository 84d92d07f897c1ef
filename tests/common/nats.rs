//! nats harness placeholder
