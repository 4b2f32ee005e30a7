"""Board boot script: copied to /main.py on the ESP32 (/flash/main.py in the emulator)."""

from firmware import device

device.main()
