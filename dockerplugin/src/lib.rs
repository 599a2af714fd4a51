//! lcfs dockerplugin: not yet implemented; see the project issues.
