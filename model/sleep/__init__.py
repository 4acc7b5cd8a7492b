"""Sleep: consolidation (Knowledge Seeding, Learning to Imitate) with its losses and rewards, rehearsal, dreaming with its trials, checks and policy, and the SFT they train with."""
