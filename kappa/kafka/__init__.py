"""The Kafka side: admin calls, the embedded broker or cluster, leader availability, credentials."""
