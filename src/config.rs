//! Model configuration (config.json). (in progress)
