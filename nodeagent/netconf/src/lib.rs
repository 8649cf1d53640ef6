//! Declarative host network configurator.
