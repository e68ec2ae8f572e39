"""Hardware: opening and closing the core, the one facade for every device
call, and the cartridge loader's serial driver."""
