# Inside the VM: run the demo steps on the injected image.
exec bash /demo/steps.sh /demo/sample.img /usr/local/bin/ublk-http
